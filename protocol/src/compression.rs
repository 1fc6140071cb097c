//! Per-chunk compression schemes of the xorb format, and the writer's choice
//! among them.
//!
//! Model weights are mostly floats, on which a general-purpose compressor
//! does little: the sign/exponent byte of each word is very predictable, the
//! low mantissa bytes are noise, and interleaved they look like noise. The
//! byte-grouped schemes first split the chunk into byte planes (byte 0 of
//! every word, then byte 1, ...) so zstd sees the predictable plane on its own.
//! The byte-plane schemes go further: each plane is stored on its own, a
//! noise plane as it is (no compressor touches it, on either side) and a
//! predictable one as a zstd frame, where it is all literals for zstd's
//! Huffman stage.

use std::cell::RefCell;
use std::sync::OnceLock;

/// How a chunk's bytes are stored in its frame (the frame's scheme byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Scheme {
    /// The bytes as they are.
    Raw = 0,
    /// One zstd frame of the bytes.
    Zstd = 1,
    /// One zstd frame of the bytes grouped into 2 byte planes (bf16, f16).
    ByteGrouped2Zstd = 2,
    /// One zstd frame of the bytes grouped into 4 byte planes (f32).
    ByteGrouped4Zstd = 3,
    /// 2 byte planes (bf16, f16), each stored raw or as its own zstd frame.
    BytePlanes2 = 4,
    /// 4 byte planes (f32), each stored raw or as its own zstd frame.
    BytePlanes4 = 5,
}

impl Scheme {
    pub const ALL: [Scheme; 6] = [
        Scheme::Raw,
        Scheme::Zstd,
        Scheme::ByteGrouped2Zstd,
        Scheme::ByteGrouped4Zstd,
        Scheme::BytePlanes2,
        Scheme::BytePlanes4,
    ];

    pub fn from_u8(b: u8) -> Option<Self> {
        Self::ALL.get(usize::from(b)).copied()
    }

    /// Width of the words split into planes (1: no grouping).
    pub fn group_width(self) -> usize {
        match self {
            Scheme::Raw | Scheme::Zstd => 1,
            Scheme::ByteGrouped2Zstd | Scheme::BytePlanes2 => 2,
            Scheme::ByteGrouped4Zstd | Scheme::BytePlanes4 => 4,
        }
    }

    /// Whether the payload stores each byte plane on its own.
    fn per_plane(self) -> bool {
        matches!(self, Scheme::BytePlanes2 | Scheme::BytePlanes4)
    }
}

/// zstd level of every compressed scheme: the measured sweet spot for weights.
pub const ZSTD_LEVEL: i32 = 1;
/// zstd settings for byte planes, measured on bf16 and f32 weights: planes
/// are either noise or low-entropy symbols with few long repeats, so the
/// fastest match finder (level -20) with matches of at least 7 bytes and
/// Huffman-coded literals (which negative levels otherwise skip) is both
/// faster and smaller than level 1 (bf16: 0.671 vs 0.690 of raw, 573 vs
/// 311 MB/s compressing).
pub const PLANE_ZSTD_LEVEL: i32 = -20;
/// A compressed form is kept only if it saves at least 1/32 of the chunk;
/// otherwise the chunk is stored raw (cheaper to read, nothing lost).
pub const MIN_SAVING_DIV: usize = 32;

/// The writer's policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// Store every chunk raw.
    Raw,
    /// Try this scheme on every chunk; raw where it does not pay.
    Fixed(Scheme),
    /// Let [`predict`] pick a scheme per chunk from a small sample, and try
    /// only that one; raw where it does not pay.
    #[default]
    Auto,
}

/// Splits `data` into `w` byte planes: byte `j` of every whole `w`-byte word
/// goes to plane `j`; the `len % w` tail bytes follow ungrouped.
pub fn group(data: &[u8], w: usize, out: &mut Vec<u8>) {
    out.clear();
    out.resize(data.len(), 0);
    let words = data.len() / w;
    let (planes, tail) = out.split_at_mut(words * w);
    tail.copy_from_slice(&data[words * w..]);
    let src = &data[..words * w];
    match w {
        2 => {
            let (p0, p1) = planes.split_at_mut(words);
            group2(src, p0, p1);
        }
        4 => {
            let (p0, rest) = planes.split_at_mut(words);
            let (p1, rest) = rest.split_at_mut(words);
            let (p2, p3) = rest.split_at_mut(words);
            group4(src, [p0, p1, p2, p3]);
        }
        _ => planes.copy_from_slice(src),
    }
}

/// Byte 0 of each 16-bit lane of `x`, packed into 4 bytes (SWAR: the
/// compiler does not vectorise a strided byte gather, shifts it does).
#[inline(always)]
fn even_bytes(x: u64) -> [u8; 4] {
    let x = x & 0x00ff_00ff_00ff_00ff;
    let x = (x | (x >> 8)) & 0x0000_ffff_0000_ffff;
    ((x | (x >> 16)) as u32).to_le_bytes()
}

fn group2(src: &[u8], p0: &mut [u8], p1: &mut [u8]) {
    let mut words = src.chunks_exact(8);
    let mut a = p0.chunks_exact_mut(4);
    let mut b = p1.chunks_exact_mut(4);
    for ((s, a), b) in (&mut words).zip(&mut a).zip(&mut b) {
        let x = u64::from_le_bytes(s.try_into().expect("8 bytes"));
        a.copy_from_slice(&even_bytes(x));
        b.copy_from_slice(&even_bytes(x >> 8));
    }
    let rest = words.remainder().chunks_exact(2);
    for ((s, a), b) in rest.zip(a.into_remainder()).zip(b.into_remainder()) {
        *a = s[0];
        *b = s[1];
    }
}

fn group4(src: &[u8], planes: [&mut [u8]; 4]) {
    // Byte `j` of both 32-bit words of a u64, packed into 2 bytes.
    let pick = |x: u64, j: u32| {
        let v = (x >> (8 * j)) & 0x0000_00ff_0000_00ff;
        (v | (v >> 24)) as u16
    };
    let [p0, p1, p2, p3] = planes;
    let mut words = src.chunks_exact(16);
    let mut out = [
        p0.chunks_exact_mut(4),
        p1.chunks_exact_mut(4),
        p2.chunks_exact_mut(4),
        p3.chunks_exact_mut(4),
    ];
    for s in &mut words {
        let x = u64::from_le_bytes(s[..8].try_into().expect("8 bytes"));
        let y = u64::from_le_bytes(s[8..].try_into().expect("8 bytes"));
        for (j, plane) in (0u32..).zip(out.iter_mut()) {
            let four = u32::from(pick(x, j)) | (u32::from(pick(y, j)) << 16);
            plane
                .next()
                .expect("planes hold a quarter of the words")
                .copy_from_slice(&four.to_le_bytes());
        }
    }
    let [a, b, c, d] = out.map(|p| p.into_remainder());
    let rest = words.remainder().chunks_exact(4);
    for (i, s) in rest.enumerate() {
        (a[i], b[i], c[i], d[i]) = (s[0], s[1], s[2], s[3]);
    }
}

/// Inverse of [`group`]: `out` must be as long as `grouped`.
pub fn ungroup(grouped: &[u8], w: usize, out: &mut [u8]) {
    assert_eq!(grouped.len(), out.len(), "ungroup needs equal lengths");
    let words = grouped.len() / w;
    let (planes, tail) = grouped.split_at(words * w);
    let planes: Vec<&[u8]> = planes.chunks(words.max(1)).collect();
    ungroup_planes(&planes, tail, out);
}

/// Interleaves `w` planes of `m` bytes (then the tail) into `out`: chunk
/// byte `w·i + j` = byte `i` of plane `j`.
fn ungroup_planes(planes: &[&[u8]], tail: &[u8], out: &mut [u8]) {
    let w = planes.len().max(1);
    let words = planes.first().map_or(0, |p| p.len());
    let (dst, out_tail) = out.split_at_mut(words * w);
    out_tail.copy_from_slice(tail);
    // Fixed-size blocks let the compiler turn the interleave into shuffles.
    const B: usize = 32;
    match planes {
        [p0, p1] => {
            let mut d = dst.chunks_exact_mut(2 * B);
            let (mut a, mut b) = (p0.chunks_exact(B), p1.chunks_exact(B));
            for ((d, a), b) in (&mut d).zip(&mut a).zip(&mut b) {
                let d: &mut [u8; 2 * B] = d.try_into().expect("block");
                for i in 0..B {
                    d[2 * i] = a[i];
                    d[2 * i + 1] = b[i];
                }
            }
            let rest = d.into_remainder().chunks_exact_mut(2);
            for ((d, a), b) in rest.zip(a.remainder()).zip(b.remainder()) {
                d.copy_from_slice(&[*a, *b]);
            }
        }
        [p0, p1, p2, p3] => {
            let mut d = dst.chunks_exact_mut(4 * B);
            let (mut a, mut b) = (p0.chunks_exact(B), p1.chunks_exact(B));
            let (mut c, mut e) = (p2.chunks_exact(B), p3.chunks_exact(B));
            for ((((d, a), b), c), e) in (&mut d).zip(&mut a).zip(&mut b).zip(&mut c).zip(&mut e) {
                let d: &mut [u8; 4 * B] = d.try_into().expect("block");
                for i in 0..B {
                    d[4 * i] = a[i];
                    d[4 * i + 1] = b[i];
                    d[4 * i + 2] = c[i];
                    d[4 * i + 3] = e[i];
                }
            }
            let rest = d.into_remainder().chunks_exact_mut(4);
            let tails = a
                .remainder()
                .iter()
                .zip(b.remainder())
                .zip(c.remainder())
                .zip(e.remainder());
            for (d, (((a, b), c), e)) in rest.zip(tails) {
                d.copy_from_slice(&[*a, *b, *c, *e]);
            }
        }
        _ => dst.copy_from_slice(planes.concat().as_slice()),
    }
}

thread_local! {
    static COMPRESSOR: RefCell<Option<zstd::bulk::Compressor<'static>>> = const { RefCell::new(None) };
    static PLANE_CCTX: RefCell<Option<zstd::zstd_safe::CCtx<'static>>> = const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

fn zstd_compress(data: &[u8]) -> std::io::Result<Vec<u8>> {
    COMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(zstd::bulk::Compressor::new(ZSTD_LEVEL)?);
        }
        slot.as_mut().expect("just set").compress(data)
    })
}

fn zstd_error(code: usize) -> String {
    zstd::zstd_safe::get_error_name(code).to_owned()
}

/// Runs `f` with this thread's compression context for byte planes
/// ([`PLANE_ZSTD_LEVEL`], minimum match 7, Huffman-coded literals).
fn with_plane_cctx<T>(
    f: impl FnOnce(&mut zstd::zstd_safe::CCtx<'static>) -> Result<T, String>,
) -> Result<T, String> {
    use zstd::zstd_safe::{CCtx, CParameter, ParamSwitch};
    PLANE_CCTX.with(|cell| {
        let mut slot = cell.borrow_mut();
        let cctx = match slot.as_mut() {
            Some(c) => c,
            None => {
                let mut c = CCtx::create();
                c.set_parameter(CParameter::CompressionLevel(PLANE_ZSTD_LEVEL))
                    .map_err(zstd_error)?;
                c.set_parameter(CParameter::MinMatch(7))
                    .map_err(zstd_error)?;
                c.set_parameter(CParameter::LiteralCompressionMode(ParamSwitch::Enable))
                    .map_err(zstd_error)?;
                slot.insert(c)
            }
        };
        f(cctx)
    })
}

/// Compresses grouped bytes as one zstd frame that ends a block at every
/// plane boundary: each block gets its own entropy tables, so a noisy
/// mantissa plane (stored as a raw block) does not spoil the code of a
/// predictable exponent plane. (One block over all planes codes their
/// mixture, which is most of what grouping would gain.)
fn zstd_compress_planes(grouped: &[u8], w: usize) -> Result<Vec<u8>, String> {
    use zstd::zstd_safe::{zstd_sys::ZSTD_EndDirective, InBuffer, OutBuffer, ResetDirective};
    with_plane_cctx(|cctx| {
        cctx.reset(ResetDirective::SessionOnly)
            .map_err(zstd_error)?;
        cctx.set_pledged_src_size(Some(grouped.len() as u64))
            .map_err(zstd_error)?;
        let plane = grouped.len() / w;
        let mut out = Vec::with_capacity(zstd::zstd_safe::compress_bound(grouped.len()) + 64 * w);
        for i in 0..w {
            let last = i + 1 == w;
            let piece = if last {
                &grouped[i * plane..]
            } else {
                &grouped[i * plane..(i + 1) * plane]
            };
            let directive = if last {
                ZSTD_EndDirective::ZSTD_e_end
            } else {
                ZSTD_EndDirective::ZSTD_e_flush
            };
            let mut input = InBuffer::around(piece);
            loop {
                if out.capacity() - out.len() < 1024 {
                    out.reserve(64 * 1024);
                }
                let pos = out.len();
                let mut output = OutBuffer::around_pos(&mut out, pos);
                let pending = cctx
                    .compress_stream2(&mut output, &mut input, directive)
                    .map_err(zstd_error)?;
                if pending == 0 && input.pos() == piece.len() {
                    break;
                }
            }
        }
        Ok(out)
    })
}

/// Bytes of a byte-plane payload's header: one u32 per plane.
const PLANE_LEN_BYTES: usize = 4;

/// Encodes `data` as byte planes (scheme [`Scheme::BytePlanes2`] or
/// [`Scheme::BytePlanes4`]): the stored length of each plane (u32 LE),
/// then each plane, raw when its stored length is the plane's length and
/// otherwise one zstd frame of it, then the `len % w` tail bytes. Planes
/// whose bit is set in `noise` are stored raw without a try; a compressed
/// plane is kept only if it saves 1/[`MIN_SAVING_DIV`] of the plane.
fn compress_planes(data: &[u8], w: usize, noise: u8) -> Result<Vec<u8>, String> {
    SCRATCH.with(|s| {
        let mut grouped = s.borrow_mut();
        group(data, w, &mut grouped);
        let m = data.len() / w;
        let mut out = Vec::with_capacity(data.len());
        out.resize(PLANE_LEN_BYTES * w, 0);
        let mut frame = Vec::new();
        for j in 0..w {
            let plane = &grouped[j * m..(j + 1) * m];
            let mut stored = plane;
            if noise & (1 << j) == 0 && m > 0 {
                frame.clear();
                frame.reserve(zstd::zstd_safe::compress_bound(m));
                let n = with_plane_cctx(|c| c.compress2(&mut frame, plane).map_err(zstd_error))?;
                if n < m - m / MIN_SAVING_DIV {
                    stored = &frame;
                }
            }
            out[j * PLANE_LEN_BYTES..(j + 1) * PLANE_LEN_BYTES]
                .copy_from_slice(&(stored.len() as u32).to_le_bytes());
            out.extend_from_slice(stored);
        }
        out.extend_from_slice(&grouped[m * w..]);
        Ok(out)
    })
}

/// Decodes a byte-plane payload (see [`compress_planes`]) into `out`,
/// which has the chunk's length: every length is checked against it before
/// anything is decoded, and each zstd frame must yield exactly one plane.
fn decompress_planes(payload: &[u8], w: usize, out: &mut [u8]) -> Result<(), String> {
    let m = out.len() / w;
    let header = payload
        .get(..PLANE_LEN_BYTES * w)
        .ok_or("byte-plane payload shorter than its header")?;
    let stored: Vec<usize> = header
        .chunks_exact(PLANE_LEN_BYTES)
        .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize)
        .collect();
    if let Some(j) = stored.iter().position(|&n| n > m) {
        return Err(format!("plane {j} stores more than its {m} bytes"));
    }
    let tail = out.len() - m * w;
    if header.len() + stored.iter().sum::<usize>() + tail != payload.len() {
        return Err("byte-plane lengths do not add up to the payload".into());
    }
    SCRATCH.with(|s| {
        let mut scratch = s.borrow_mut();
        scratch.clear();
        scratch.resize(m * w, 0);
        let mut pos = header.len();
        let mut planes: Vec<(usize, usize, bool)> = Vec::with_capacity(w);
        for (j, &n) in stored.iter().enumerate() {
            let raw = n == m;
            if !raw {
                zstd_decompress(&payload[pos..pos + n], &mut scratch[j * m..(j + 1) * m])
                    .map_err(|e| format!("plane {j}: {e}"))?;
            }
            planes.push((pos, n, raw));
            pos += n;
        }
        let slices: Vec<&[u8]> = planes
            .iter()
            .enumerate()
            .map(|(j, &(at, n, raw))| {
                if raw {
                    &payload[at..at + n]
                } else {
                    &scratch[j * m..(j + 1) * m]
                }
            })
            .collect();
        ungroup_planes(&slices, &payload[pos..], out);
        Ok(())
    })
}

/// Decompresses one zstd frame into exactly `out.len()` bytes.
fn zstd_decompress(payload: &[u8], out: &mut [u8]) -> Result<(), String> {
    let n = DECOMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(zstd::bulk::Decompressor::new().map_err(|e| e.to_string())?);
        }
        slot.as_mut()
            .expect("just set")
            .decompress_to_buffer(payload, out)
            .map_err(|e| e.to_string())
    })?;
    if n != out.len() {
        return Err(format!("{n} bytes, frame says {}", out.len()));
    }
    Ok(())
}

/// Encodes `data` with `scheme`; `None` when the result would not be smaller
/// than the chunk by at least 1/[`MIN_SAVING_DIV`] (store it raw then).
pub fn compress(data: &[u8], scheme: Scheme) -> Option<Vec<u8>> {
    compress_with(data, scheme, 0)
}

/// As [`compress`], storing the planes in `noise` raw without a try.
fn compress_with(data: &[u8], scheme: Scheme, noise: u8) -> Option<Vec<u8>> {
    let limit = data.len() - data.len() / MIN_SAVING_DIV;
    let z = match scheme {
        Scheme::Raw => return None,
        Scheme::Zstd => zstd_compress(data).ok()?,
        planes if planes.per_plane() => compress_planes(data, planes.group_width(), noise).ok()?,
        grouped => SCRATCH.with(|s| {
            let mut planes = s.borrow_mut();
            group(data, grouped.group_width(), &mut planes);
            zstd_compress_planes(&planes, grouped.group_width()).ok()
        })?,
    };
    (z.len() < limit && z.len() < data.len()).then_some(z)
}

/// Decodes a payload of `scheme` into `out`, which has the chunk's length.
pub fn decompress(scheme: Scheme, payload: &[u8], out: &mut [u8]) -> Result<(), String> {
    match scheme {
        Scheme::Raw => {
            if payload.len() != out.len() {
                return Err("raw payload length differs from the chunk length".into());
            }
            out.copy_from_slice(payload);
            Ok(())
        }
        Scheme::Zstd => zstd_decompress(payload, out),
        planes if planes.per_plane() => decompress_planes(payload, planes.group_width(), out),
        grouped => SCRATCH.with(|s| {
            let mut planes = s.borrow_mut();
            planes.clear();
            planes.resize(out.len(), 0);
            zstd_decompress(payload, &mut planes)?;
            ungroup(&planes, grouped.group_width(), out);
            Ok(())
        }),
    }
}

/// Bytes of the sample the predictor looks at.
const SAMPLE: usize = 4096;

/// `n * log2(n)` for every count a sample histogram can hold.
fn nlogn_table() -> &'static [f32; SAMPLE + 1] {
    static TABLE: OnceLock<Box<[f32; SAMPLE + 1]>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut t = Box::new([0f32; SAMPLE + 1]);
        for (n, v) in t.iter_mut().enumerate().skip(1) {
            *v = (n as f64 * (n as f64).log2()) as f32;
        }
        t
    })
}

/// Order-0 entropy of a histogram, in bits for all its bytes.
fn entropy_bits(hist: &[u32; 256], table: &[f32; SAMPLE + 1]) -> f32 {
    let total: u32 = hist.iter().sum();
    table[total as usize] - hist.iter().map(|&c| table[c as usize]).sum::<f32>()
}

/// What the predictor expects of a chunk: the scheme to try and, for the
/// byte-plane schemes, the planes that are noise (bit `j`: plane `j`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Prediction {
    scheme: Scheme,
    noise: u8,
}

/// Picks the scheme to try for a chunk from a 4 KiB sample of its middle,
/// without compressing anything: the order-0 entropy of the sample's bytes
/// as they are, in 2 planes and in 4 planes estimates what zstd's entropy
/// coder will achieve on each layout. Grouping must win by 3% to be chosen
/// (plain zstd also finds repeats that entropy misses), and a chunk whose
/// best estimate saves less than 1/[`MIN_SAVING_DIV`] is predicted raw, so
/// incompressible data costs one histogram pass instead of a zstd run.
/// Grouped data goes to the byte-plane schemes.
pub fn predict(data: &[u8]) -> Scheme {
    prediction(data).scheme
}

fn prediction(data: &[u8]) -> Prediction {
    let plain = |scheme| Prediction { scheme, noise: 0 };
    let n = data.len().min(SAMPLE) & !3;
    if n < 64 {
        return plain(Scheme::Zstd);
    }
    let start = ((data.len() - n) / 2) & !3;
    let sample = &data[start..start + n];
    // One pass fills the 4-plane histograms; the 2-plane and whole-sample
    // histograms are sums of them.
    let mut h4 = [[0u32; 256]; 4];
    for word in sample.chunks_exact(4) {
        for (h, &b) in h4.iter_mut().zip(word) {
            h[b as usize] += 1;
        }
    }
    let sum =
        |a: &[u32; 256], b: &[u32; 256]| -> [u32; 256] { std::array::from_fn(|i| a[i] + b[i]) };
    let h2 = [sum(&h4[0], &h4[2]), sum(&h4[1], &h4[3])];
    let h1 = sum(&h2[0], &h2[1]);
    let t = nlogn_table();
    let e2: Vec<f32> = h2.iter().map(|h| entropy_bits(h, t)).collect();
    let e4: Vec<f32> = h4.iter().map(|h| entropy_bits(h, t)).collect();
    let mut best = (Scheme::Zstd, entropy_bits(&h1, t), &[][..]);
    for (scheme, planes) in [(Scheme::BytePlanes2, &e2), (Scheme::BytePlanes4, &e4)] {
        let e: f32 = planes.iter().sum();
        if e < best.1 * 0.97 {
            best = (scheme, e, planes);
        }
    }
    let saving = |bits: usize| (bits - bits / MIN_SAVING_DIV) as f32;
    if best.1 > saving(n * 8) {
        return plain(Scheme::Raw);
    }
    // A plane whose sample would not save 1/32 is stored as it is.
    let plane_bits = n * 8 / best.2.len().max(1);
    let noise = best
        .2
        .iter()
        .enumerate()
        .filter(|(_, &e)| e > saving(plane_bits))
        .fold(0u8, |m, (j, _)| m | 1 << j);
    Prediction {
        scheme: best.0,
        noise,
    }
}

/// Encodes a chunk under `policy`: the scheme used and its payload.
pub fn encode(data: &[u8], policy: Compression) -> (Scheme, Option<Vec<u8>>) {
    let p = match policy {
        Compression::Raw => return (Scheme::Raw, None),
        Compression::Fixed(scheme) => Prediction { scheme, noise: 0 },
        Compression::Auto => prediction(data),
    };
    match compress_with(data, p.scheme, p.noise) {
        Some(z) => (p.scheme, Some(z)),
        None => (Scheme::Raw, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn grouping_layout() {
        let mut g = Vec::new();
        group(b"aAbBcCd", 2, &mut g);
        assert_eq!(g, b"abcABCd");
        group(b"0123456789", 4, &mut g);
        assert_eq!(g, b"0415263789");
        let mut back = vec![0; 10];
        ungroup(&g, 4, &mut back);
        assert_eq!(back, b"0123456789");
    }

    #[test]
    fn predictor_on_clear_cases() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut noise = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let random: Vec<u8> = (0..65536).map(|_| noise() as u8).collect();
        assert_eq!(predict(&random), Scheme::Raw);
        assert_eq!(predict(&[0u8; 65536]), Scheme::Zstd);
        let words = [
            "the ", "quick ", "brown ", "fox ", "jumps ", "over ", "a ", "lazy ", "dog. ",
        ];
        let text: String = (0..12000)
            .map(|_| words[noise() as usize % words.len()])
            .collect();
        assert_eq!(predict(text.as_bytes()), Scheme::Zstd);
        // Little-endian words whose high byte is nearly constant and low
        // byte is noise: exactly what grouping is for.
        let words2: Vec<u8> = (0..32768)
            .flat_map(|_| [noise() as u8, 0x3c | (noise() as u8 & 1)])
            .collect();
        assert_eq!(predict(&words2), Scheme::BytePlanes2);
        assert_eq!(prediction(&words2).noise, 0b01, "the low byte is noise");
        let words4: Vec<u8> = (0..16384)
            .flat_map(|_| [noise() as u8, noise() as u8, noise() as u8 & 0x83, 0x3c])
            .collect();
        assert_eq!(predict(&words4), Scheme::BytePlanes4);
        assert_eq!(prediction(&words4).noise, 0b0011);
    }

    proptest! {
        #[test]
        fn every_scheme_round_trips(data in proptest::collection::vec(any::<u8>(), 1..5000), bias in any::<bool>()) {
            // Biased data compresses, so the compressed paths are exercised.
            let data: Vec<u8> = if bias { data.iter().map(|b| b & 0x0f).collect() } else { data };
            for scheme in Scheme::ALL {
                let mut out = vec![0u8; data.len()];
                match compress(&data, scheme) {
                    Some(z) => {
                        prop_assert!(z.len() < data.len());
                        decompress(scheme, &z, &mut out).unwrap();
                    }
                    None => decompress(Scheme::Raw, &data, &mut out).unwrap(),
                }
                prop_assert_eq!(&out, &data);
            }
            for w in [2, 4] {
                let mut g = Vec::new();
                group(&data, w, &mut g);
                let mut back = vec![0; data.len()];
                ungroup(&g, w, &mut back);
                prop_assert_eq!(&back, &data);
            }
        }

        /// The fast grouping equals the definition in docs/PROTOCOL.md
        /// (grouped byte `j·m + i` is chunk byte `w·i + j`, tail last).
        #[test]
        fn grouping_matches_its_definition(data in proptest::collection::vec(any::<u8>(), 0..3000)) {
            for w in [2, 4] {
                let m = data.len() / w;
                let mut want: Vec<u8> = (0..w).flat_map(|j| (0..m).map(move |i| (j, i)))
                    .map(|(j, i)| data[w * i + j]).collect();
                want.extend_from_slice(&data[m * w..]);
                let mut g = Vec::new();
                group(&data, w, &mut g);
                prop_assert_eq!(&g, &want);
            }
        }

        /// A byte-plane decoder given any payload for any length returns an
        /// error or exactly `len` bytes, never panics.
        #[test]
        fn plane_decoder_survives_any_payload(
            payload in proptest::collection::vec(any::<u8>(), 0..400),
            len in 0usize..600,
            four in any::<bool>(),
        ) {
            let scheme = if four { Scheme::BytePlanes4 } else { Scheme::BytePlanes2 };
            let mut out = vec![0u8; len];
            let _ = decompress(scheme, &payload, &mut out);
        }
    }

    /// bf16-like words: the noise plane is stored as it is (its stored
    /// length is the plane's length), the predictable one compressed; the
    /// payload decodes to the chunk, odd tail included.
    #[test]
    fn byte_planes_store_noise_raw() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut data: Vec<u8> = (0..40_000)
            .flat_map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                [x as u8, 0x3c | (x >> 8) as u8 & 0x01]
            })
            .collect();
        data.push(7);
        let (scheme, payload) = encode(&data, Compression::Auto);
        assert_eq!(scheme, Scheme::BytePlanes2);
        let payload = payload.unwrap();
        let m = data.len() / 2;
        let stored0 = u32::from_le_bytes(payload[..4].try_into().unwrap()) as usize;
        let stored1 = u32::from_le_bytes(payload[4..8].try_into().unwrap()) as usize;
        assert_eq!(stored0, m, "noise plane raw");
        assert!(stored1 < m / 4, "exponent-like plane compressed: {stored1}");
        assert_eq!(
            &payload[8..8 + m],
            &data.iter().step_by(2).take(m).copied().collect::<Vec<_>>()[..]
        );
        let mut out = vec![0; data.len()];
        decompress(scheme, &payload, &mut out).unwrap();
        assert_eq!(out, data);
        // Damage: a length past the plane, lengths that do not add up, a
        // broken frame.
        for (at, v) in [(0, 0xff), (4, 1), (payload.len() - 2, 0x55)] {
            let mut bad = payload.clone();
            bad[at] ^= v;
            assert!(decompress(scheme, &bad, &mut out).is_err(), "byte {at}");
        }
    }
}
