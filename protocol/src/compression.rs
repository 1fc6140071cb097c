//! Per-chunk compression schemes of the xorb format, and the writer's choice
//! among them.
//!
//! Model weights are mostly floats, on which a general-purpose compressor
//! does little: the sign/exponent byte of each word is very predictable, the
//! low mantissa bytes are noise, and interleaved they look like noise. The
//! byte-grouped schemes first split the chunk into byte planes (byte 0 of
//! every word, then byte 1, ...) so zstd sees the predictable plane on its own.

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
}

impl Scheme {
    pub const ALL: [Scheme; 4] = [
        Scheme::Raw,
        Scheme::Zstd,
        Scheme::ByteGrouped2Zstd,
        Scheme::ByteGrouped4Zstd,
    ];

    pub fn from_u8(b: u8) -> Option<Self> {
        Self::ALL.get(usize::from(b)).copied()
    }

    /// Width of the words split into planes (1: no grouping).
    pub fn group_width(self) -> usize {
        match self {
            Scheme::Raw | Scheme::Zstd => 1,
            Scheme::ByteGrouped2Zstd => 2,
            Scheme::ByteGrouped4Zstd => 4,
        }
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
    match w {
        2 => {
            let (p0, p1) = planes.split_at_mut(words);
            let src = &data[..words * 2];
            for i in 0..words {
                p0[i] = src[2 * i];
                p1[i] = src[2 * i + 1];
            }
        }
        4 => {
            let (p0, rest) = planes.split_at_mut(words);
            let (p1, rest) = rest.split_at_mut(words);
            let (p2, p3) = rest.split_at_mut(words);
            let src = &data[..words * 4];
            for i in 0..words {
                p0[i] = src[4 * i];
                p1[i] = src[4 * i + 1];
                p2[i] = src[4 * i + 2];
                p3[i] = src[4 * i + 3];
            }
        }
        _ => planes.copy_from_slice(&data[..words * w]),
    }
}

/// Inverse of [`group`]: `out` must be as long as `grouped`.
pub fn ungroup(grouped: &[u8], w: usize, out: &mut [u8]) {
    assert_eq!(grouped.len(), out.len(), "ungroup needs equal lengths");
    let words = grouped.len() / w;
    let (planes, tail) = grouped.split_at(words * w);
    let (dst, out_tail) = out.split_at_mut(words * w);
    out_tail.copy_from_slice(tail);
    match w {
        2 => {
            let (p0, p1) = planes.split_at(words);
            for i in 0..words {
                dst[2 * i] = p0[i];
                dst[2 * i + 1] = p1[i];
            }
        }
        4 => {
            let (p0, rest) = planes.split_at(words);
            let (p1, rest) = rest.split_at(words);
            let (p2, p3) = rest.split_at(words);
            for i in 0..words {
                dst[4 * i] = p0[i];
                dst[4 * i + 1] = p1[i];
                dst[4 * i + 2] = p2[i];
                dst[4 * i + 3] = p3[i];
            }
        }
        _ => dst.copy_from_slice(planes),
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

/// Compresses grouped bytes as one zstd frame that ends a block at every
/// plane boundary: each block gets its own entropy tables, so a noisy
/// mantissa plane (stored as a raw block) does not spoil the code of a
/// predictable exponent plane. (One block over all planes codes their
/// mixture, which is most of what grouping would gain.)
fn zstd_compress_planes(grouped: &[u8], w: usize) -> Result<Vec<u8>, String> {
    use zstd::zstd_safe::{
        zstd_sys::ZSTD_EndDirective, CCtx, CParameter, InBuffer, OutBuffer, ParamSwitch,
        ResetDirective,
    };
    let err = |code| zstd::zstd_safe::get_error_name(code).to_owned();
    PLANE_CCTX.with(|cell| {
        let mut slot = cell.borrow_mut();
        let cctx = match slot.as_mut() {
            Some(c) => c,
            None => {
                let mut c = CCtx::create();
                c.set_parameter(CParameter::CompressionLevel(PLANE_ZSTD_LEVEL))
                    .map_err(err)?;
                c.set_parameter(CParameter::MinMatch(7)).map_err(err)?;
                c.set_parameter(CParameter::LiteralCompressionMode(ParamSwitch::Enable))
                    .map_err(err)?;
                slot.insert(c)
            }
        };
        cctx.reset(ResetDirective::SessionOnly).map_err(err)?;
        cctx.set_pledged_src_size(Some(grouped.len() as u64))
            .map_err(err)?;
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
                    .map_err(err)?;
                if pending == 0 && input.pos() == piece.len() {
                    break;
                }
            }
        }
        Ok(out)
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
    let limit = data.len() - data.len() / MIN_SAVING_DIV;
    let z = match scheme {
        Scheme::Raw => return None,
        Scheme::Zstd => zstd_compress(data).ok()?,
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

/// Picks the scheme to try for a chunk from a 4 KiB sample of its middle,
/// without compressing anything: the order-0 entropy of the sample's bytes
/// as they are, in 2 planes and in 4 planes estimates what zstd's entropy
/// coder will achieve on each layout. Grouping must win by 3% to be chosen
/// (plain zstd also finds repeats that entropy misses), and a chunk whose
/// best estimate saves less than 1/[`MIN_SAVING_DIV`] is predicted raw, so
/// incompressible data costs one histogram pass instead of a zstd run.
pub fn predict(data: &[u8]) -> Scheme {
    let n = data.len().min(SAMPLE) & !3;
    if n < 64 {
        return Scheme::Zstd;
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
    let e1 = entropy_bits(&h1, t);
    let e2: f32 = h2.iter().map(|h| entropy_bits(h, t)).sum();
    let e4: f32 = h4.iter().map(|h| entropy_bits(h, t)).sum();
    let (mut best, mut bits) = (Scheme::Zstd, e1);
    for (scheme, e) in [
        (Scheme::ByteGrouped2Zstd, e2),
        (Scheme::ByteGrouped4Zstd, e4),
    ] {
        if e < bits * 0.97 {
            (best, bits) = (scheme, e);
        }
    }
    let raw_bits = (n * 8) as f32;
    if bits > raw_bits - raw_bits / MIN_SAVING_DIV as f32 {
        return Scheme::Raw;
    }
    best
}

/// Encodes a chunk under `policy`: the scheme used and its payload.
pub fn encode(data: &[u8], policy: Compression) -> (Scheme, Option<Vec<u8>>) {
    let scheme = match policy {
        Compression::Raw => return (Scheme::Raw, None),
        Compression::Fixed(s) => s,
        Compression::Auto => predict(data),
    };
    match compress(data, scheme) {
        Some(z) => (scheme, Some(z)),
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
        assert_eq!(predict(&words2), Scheme::ByteGrouped2Zstd);
        let words4: Vec<u8> = (0..16384)
            .flat_map(|_| [noise() as u8, noise() as u8, noise() as u8 & 0x83, 0x3c])
            .collect();
        assert_eq!(predict(&words4), Scheme::ByteGrouped4Zstd);
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
    }
}
