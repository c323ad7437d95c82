//! A tiny, deterministic llama-architecture GGUF model that a real `llama-server` loads and serves.
//!
//! The weights are pseudo-random, so the model talks nonsense, but everything around the weights is
//! real: a SentencePiece-style vocabulary with byte fallback, a ChatML chat template, an end-of-turn
//! token, and a 65,536-token trained context so tests can ask for any `-c` they like. The file is
//! about half a megabyte and generates thousands of tokens per second on one core, which keeps tests
//! that drive a real server fast.
//!
//! The layout of the model matches the `make_tiny_model.py` script kept next to the shared test model,
//! so the two can be compared field by field; only the weight values differ, because they come from
//! the small generator in this module rather than from numpy.
//!
//! # Layout
//! - [`tiny_model`] / [`write_tiny_model`] / [`tiny_model_bytes`]: the public entry points.
//! - `GgufWriter`: a minimal GGUF v3 serializer (metadata values plus F32 tensors).
//! - `vocab`: the token table; `Rng`: the weight generator.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Embedding width.
const N_EMBD: u64 = 64;
/// Number of transformer blocks.
const N_LAYER: u64 = 2;
/// Attention heads (and key/value heads: no grouped-query attention).
const N_HEAD: u64 = 4;
/// Feed-forward hidden width.
const N_FF: u64 = 128;
/// Trained context length; large so that tests never hit llama-server's "n_ctx > n_ctx_train" warning.
const N_CTX: u32 = 65_536;
/// Standard deviation of the random weights: small enough that activations stay finite through
/// both blocks, so the server never trips over NaN logits.
const WEIGHT_STD: f64 = 0.05;
/// Fixed seed: every process writes byte-identical files.
const SEED: u64 = 1234;

/// GGUF requires tensor data (and the start of the data section) aligned to this many bytes
/// unless `general.alignment` says otherwise; we keep the default.
pub const ALIGNMENT: u64 = 32;

/// ChatML, the template Falcon3 and many other instruction models use, so prompts built by the
/// server look like the ones real deployments see.
const CHATML: &str = concat!(
    "{% for message in messages %}",
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}",
    "{% endfor %}",
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
);

/// Returns the path of the tiny model, writing it on first use.
///
/// The file lives under `std::env::temp_dir()/bitnet-testkit/` and its name carries a hash of its
/// contents, so a stale file from an older version of this writer is never picked up and parallel
/// test processes share one copy. It is written to a unique temporary name and renamed into place,
/// so a reader never sees a half-written model.
///
/// # Panics
/// If the file cannot be written: there is nothing a test can do without its model.
pub fn tiny_model() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        install_tiny_model(&std::env::temp_dir().join("bitnet-testkit"))
            .unwrap_or_else(|e| panic!("cannot write the tiny test model: {e}"))
    })
    .clone()
}

/// Writes the tiny model to `path`, replacing any file there.
pub fn write_tiny_model(path: &Path) -> io::Result<()> {
    std::fs::write(path, tiny_model_bytes())
}

/// The complete GGUF file of the tiny model. Deterministic: every call returns the same bytes.
pub fn tiny_model_bytes() -> Vec<u8> {
    let toks = vocab();
    let n_vocab = toks.len() as u64;

    let mut w = GgufWriter::default();
    w.kv("general.architecture", Value::Str("llama".into()));
    w.kv("general.name", Value::Str("tiny-test-llama".into()));
    w.kv("llama.context_length", Value::U32(N_CTX));
    w.kv("llama.embedding_length", Value::U32(N_EMBD as u32));
    w.kv("llama.block_count", Value::U32(N_LAYER as u32));
    w.kv("llama.feed_forward_length", Value::U32(N_FF as u32));
    w.kv("llama.attention.head_count", Value::U32(N_HEAD as u32));
    w.kv("llama.attention.head_count_kv", Value::U32(N_HEAD as u32));
    w.kv(
        "llama.rope.dimension_count",
        Value::U32((N_EMBD / N_HEAD) as u32),
    );
    w.kv("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5));
    // 0 = all tensors F32.
    w.kv("general.file_type", Value::U32(0));
    w.kv("tokenizer.ggml.model", Value::Str("llama".into()));
    w.kv(
        "tokenizer.ggml.tokens",
        Value::StrArray(toks.iter().map(|t| t.text.clone()).collect()),
    );
    w.kv(
        "tokenizer.ggml.scores",
        Value::F32Array(toks.iter().map(|t| t.score).collect()),
    );
    w.kv(
        "tokenizer.ggml.token_type",
        Value::I32Array(toks.iter().map(|t| t.kind as i32).collect()),
    );
    w.kv("tokenizer.ggml.bos_token_id", Value::U32(BOS));
    // End of generation is the end of the assistant's turn, as in real ChatML models.
    w.kv("tokenizer.ggml.eos_token_id", Value::U32(IM_END));
    w.kv("tokenizer.ggml.unknown_token_id", Value::U32(UNK));
    w.kv("tokenizer.ggml.add_bos_token", Value::Bool(false));
    w.kv("tokenizer.chat_template", Value::Str(CHATML.into()));

    let mut rng = Rng::new(SEED);
    let mut random = |w: &mut GgufWriter, name: &str, dims: [u64; 2]| {
        let data = (0..dims[0] * dims[1])
            .map(|_| (rng.normal() * WEIGHT_STD) as f32)
            .collect();
        w.tensor(name, &dims, data);
    };
    let ones =
        |w: &mut GgufWriter, name: &str| w.tensor(name, &[N_EMBD], vec![1.0; N_EMBD as usize]);

    // Dimensions are GGUF order: the fastest-varying (row length) first.
    random(&mut w, "token_embd.weight", [N_EMBD, n_vocab]);
    ones(&mut w, "output_norm.weight");
    random(&mut w, "output.weight", [N_EMBD, n_vocab]);
    for i in 0..N_LAYER {
        ones(&mut w, &format!("blk.{i}.attn_norm.weight"));
        for n in ["attn_q", "attn_k", "attn_v", "attn_output"] {
            random(&mut w, &format!("blk.{i}.{n}.weight"), [N_EMBD, N_EMBD]);
        }
        ones(&mut w, &format!("blk.{i}.ffn_norm.weight"));
        random(&mut w, &format!("blk.{i}.ffn_gate.weight"), [N_EMBD, N_FF]);
        random(&mut w, &format!("blk.{i}.ffn_up.weight"), [N_EMBD, N_FF]);
        random(&mut w, &format!("blk.{i}.ffn_down.weight"), [N_FF, N_EMBD]);
    }
    w.finish()
}

/// Writes the model into `dir` under a content-addressed name unless it is already there.
fn install_tiny_model(dir: &Path) -> io::Result<PathBuf> {
    let bytes = tiny_model_bytes();
    let path = dir.join(format!("tiny-llama-{:016x}.gguf", fnv1a(&bytes)));
    if std::fs::metadata(&path).is_ok_and(|m| m.len() == bytes.len() as u64) {
        return Ok(path);
    }
    std::fs::create_dir_all(dir)?;
    // Unique per process and per call, so concurrent writers never share a temporary file; the
    // rename is atomic and every writer produces the same bytes, so the last one to win is fine.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let tmp = dir.join(format!(".tiny-llama.{}.{nanos}.tmp", std::process::id()));
    let written = std::fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(&bytes).and_then(|()| f.sync_all()))
        .and_then(|()| std::fs::rename(&tmp, &path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.map(|()| path)
}

/// 64-bit FNV-1a: a content fingerprint for the file name, not a security measure.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

// === Vocabulary ===

const UNK: u32 = 0;
const BOS: u32 = 1;
const IM_END: u32 = 4;

/// llama.cpp's `llama_token_type` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TokenKind {
    Normal = 1,
    Unknown = 2,
    Control = 3,
    Byte = 6,
}

#[derive(Debug)]
struct Token {
    text: String,
    score: f32,
    kind: TokenKind,
}

/// Control tokens, the 256 byte-fallback tokens (so any UTF-8 input tokenizes), then letters,
/// digits, punctuation and a few common words with the SentencePiece word-start marker.
fn vocab() -> Vec<Token> {
    let tok = |text: &str, kind| Token {
        text: text.to_owned(),
        score: 0.0,
        kind,
    };
    let mut toks = vec![
        tok("<unk>", TokenKind::Unknown),
        tok("<s>", TokenKind::Control),
        tok("</s>", TokenKind::Control),
        tok("<|im_start|>", TokenKind::Control),
        tok("<|im_end|>", TokenKind::Control),
    ];
    toks.extend((0..=255u8).map(|b| tok(&format!("<0x{b:02X}>"), TokenKind::Byte)));

    const WORDS: &str =
        "the of and to in is it that for on with as was at by be this are from or an \
        have not but what all were when we there can one more if out so up said about \
        hello world two four equals plus answer user assistant system yes no model \
        bitnet falcon token stream local server gateway";
    let mut pieces: Vec<String> = vec!["\u{2581}".into()];
    pieces.extend(('a'..='z').chain('A'..='Z').map(String::from));
    pieces.extend("0123456789.,!?:;'\"-()".chars().map(String::from));
    pieces.extend(WORDS.split_whitespace().map(|w| format!("\u{2581}{w}")));
    pieces.extend(('a'..='z').map(|c| format!("\u{2581}{c}")));

    let mut seen = std::collections::HashSet::new();
    for (i, piece) in pieces.into_iter().enumerate() {
        if !seen.insert(piece.clone()) {
            continue;
        }
        // Single characters score by position and everything longer scores below them, so the
        // tokenizer prefers whole words where it has them. Computed in f64 then narrowed, to land
        // on the same f32 values as the reference script.
        let score = if piece.chars().count() == 1 {
            -(toks.len() as f64) / 100.0
        } else {
            -1.0 - i as f64 / 1000.0
        };
        toks.push(Token {
            text: piece,
            score: score as f32,
            kind: TokenKind::Normal,
        });
    }
    toks
}

// === Weights ===

/// splitmix64 for uniform bits, Box-Muller for normals: tiny, seedable and stable across
/// platforms and releases, which is all reproducible test weights need.
struct Rng {
    state: u64,
    spare: Option<f64>,
}

impl Rng {
    fn new(seed: u64) -> Self {
        Self {
            state: seed,
            spare: None,
        }
    }

    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1]: never 0, so the logarithm below stays finite.
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal.
    fn normal(&mut self) -> f64 {
        if let Some(z) = self.spare.take() {
            return z;
        }
        let r = (-2.0 * self.uniform().ln()).sqrt();
        let theta = std::f64::consts::TAU * self.uniform();
        self.spare = Some(r * theta.sin());
        r * theta.cos()
    }
}

// === GGUF serialization ===

/// GGUF metadata value types (`gguf_type`).
mod value_type {
    pub const U32: u32 = 4;
    pub const I32: u32 = 5;
    pub const F32: u32 = 6;
    pub const BOOL: u32 = 7;
    pub const STRING: u32 = 8;
    pub const ARRAY: u32 = 9;
}

/// `ggml_type` of a 32-bit float tensor.
const GGML_TYPE_F32: u32 = 0;

/// The metadata value shapes this model needs; GGUF has more.
enum Value {
    U32(u32),
    F32(f32),
    Bool(bool),
    Str(String),
    StrArray(Vec<String>),
    F32Array(Vec<f32>),
    I32Array(Vec<i32>),
}

struct Tensor {
    name: String,
    dims: Vec<u64>,
    data: Vec<f32>,
}

/// Collects metadata and tensors, then lays them out as a GGUF v3 file in one pass.
#[derive(Default)]
struct GgufWriter {
    kvs: Vec<(String, Value)>,
    tensors: Vec<Tensor>,
}

impl GgufWriter {
    fn kv(&mut self, key: &str, value: Value) {
        self.kvs.push((key.to_owned(), value));
    }

    fn tensor(&mut self, name: &str, dims: &[u64], data: Vec<f32>) {
        debug_assert_eq!(dims.iter().product::<u64>(), data.len() as u64);
        self.tensors.push(Tensor {
            name: name.to_owned(),
            dims: dims.to_vec(),
            data,
        });
    }

    /// Header, metadata, tensor table, padding, then each tensor's data at an aligned offset.
    fn finish(self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(b"GGUF");
        put_u32(&mut out, 3);
        put_u64(&mut out, self.tensors.len() as u64);
        put_u64(&mut out, self.kvs.len() as u64);

        for (key, value) in &self.kvs {
            put_str(&mut out, key);
            put_value(&mut out, value);
        }

        // Offsets are relative to the start of the data section, and each one is aligned.
        let mut offset = 0u64;
        for t in &self.tensors {
            put_str(&mut out, &t.name);
            put_u32(&mut out, t.dims.len() as u32);
            for &d in &t.dims {
                put_u64(&mut out, d);
            }
            put_u32(&mut out, GGML_TYPE_F32);
            put_u64(&mut out, offset);
            offset = align(offset + 4 * t.data.len() as u64);
        }

        for t in &self.tensors {
            pad(&mut out);
            for x in &t.data {
                out.extend_from_slice(&x.to_le_bytes());
            }
        }
        // Trailing padding keeps the last tensor's size a multiple of the alignment, as readers
        // that map the whole data section expect.
        pad(&mut out);
        out
    }
}

fn align(n: u64) -> u64 {
    n.div_ceil(ALIGNMENT) * ALIGNMENT
}

fn pad(out: &mut Vec<u8>) {
    out.resize(align(out.len() as u64) as usize, 0);
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_u64(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, value: &Value) {
    fn array_header(out: &mut Vec<u8>, elem_type: u32, len: usize) {
        put_u32(out, value_type::ARRAY);
        put_u32(out, elem_type);
        put_u64(out, len as u64);
    }
    match value {
        Value::U32(v) => {
            put_u32(out, value_type::U32);
            put_u32(out, *v);
        }
        Value::F32(v) => {
            put_u32(out, value_type::F32);
            out.extend_from_slice(&v.to_le_bytes());
        }
        Value::Bool(v) => {
            put_u32(out, value_type::BOOL);
            out.push(u8::from(*v));
        }
        Value::Str(s) => {
            put_u32(out, value_type::STRING);
            put_str(out, s);
        }
        Value::StrArray(items) => {
            array_header(out, value_type::STRING, items.len());
            items.iter().for_each(|s| put_str(out, s));
        }
        Value::F32Array(items) => {
            array_header(out, value_type::F32, items.len());
            items
                .iter()
                .for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
        }
        Value::I32Array(items) => {
            array_header(out, value_type::I32, items.len());
            items
                .iter()
                .for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An independent reader for the subset of GGUF the writer emits, so the tests check the
    /// format itself rather than the writer against its own helpers.
    struct Reader<'a> {
        buf: &'a [u8],
        pos: usize,
    }

    #[derive(Debug, PartialEq)]
    enum Read {
        U32(u32),
        F32(f32),
        I32(i32),
        Bool(bool),
        Str(String),
        Array(u32, usize),
    }

    struct TensorInfo {
        name: String,
        dims: Vec<u64>,
        ggml_type: u32,
        offset: u64,
    }

    impl<'a> Reader<'a> {
        fn take(&mut self, n: usize) -> &'a [u8] {
            let s = &self.buf[self.pos..self.pos + n];
            self.pos += n;
            s
        }
        fn u32(&mut self) -> u32 {
            u32::from_le_bytes(self.take(4).try_into().unwrap())
        }
        fn u64(&mut self) -> u64 {
            u64::from_le_bytes(self.take(8).try_into().unwrap())
        }
        fn str(&mut self) -> String {
            let n = self.u64() as usize;
            String::from_utf8(self.take(n).to_vec()).unwrap()
        }
        fn scalar(&mut self, ty: u32) -> Read {
            match ty {
                4 => Read::U32(self.u32()),
                5 => Read::I32(self.u32() as i32),
                6 => Read::F32(f32::from_bits(self.u32())),
                7 => Read::Bool(self.take(1)[0] != 0),
                8 => Read::Str(self.str()),
                other => panic!("unexpected value type {other}"),
            }
        }
        fn value(&mut self) -> Read {
            let ty = self.u32();
            if ty != 9 {
                return self.scalar(ty);
            }
            let elem = self.u32();
            let n = self.u64() as usize;
            for _ in 0..n {
                self.scalar(elem);
            }
            Read::Array(elem, n)
        }
    }

    struct Parsed {
        version: u32,
        kvs: Vec<(String, Read)>,
        tensors: Vec<TensorInfo>,
        data_start: usize,
    }

    fn parse(buf: &[u8]) -> Parsed {
        let mut r = Reader { buf, pos: 0 };
        assert_eq!(r.take(4), b"GGUF", "magic");
        let version = r.u32();
        let n_tensors = r.u64();
        let n_kv = r.u64();
        let kvs = (0..n_kv).map(|_| (r.str(), r.value())).collect();
        let tensors = (0..n_tensors)
            .map(|_| {
                let name = r.str();
                let n_dims = r.u32();
                let dims = (0..n_dims).map(|_| r.u64()).collect();
                TensorInfo {
                    name,
                    dims,
                    ggml_type: r.u32(),
                    offset: r.u64(),
                }
            })
            .collect();
        Parsed {
            version,
            kvs,
            tensors,
            data_start: align(r.pos as u64) as usize,
        }
    }

    fn get<'p>(p: &'p Parsed, key: &str) -> &'p Read {
        &p.kvs
            .iter()
            .find(|(k, _)| k == key)
            .unwrap_or_else(|| panic!("missing key {key}"))
            .1
    }

    #[test]
    fn header_declares_gguf_v3_with_every_tensor_and_key() {
        let p = parse(&tiny_model_bytes());
        assert_eq!(p.version, 3);
        // 3 global tensors + 9 per block.
        assert_eq!(p.tensors.len() as u64, 3 + 9 * N_LAYER);
        assert_eq!(p.kvs.len(), 20);
        assert_eq!(get(&p, "general.architecture"), &Read::Str("llama".into()));
        assert_eq!(get(&p, "llama.context_length"), &Read::U32(65_536));
        assert_eq!(get(&p, "llama.rope.dimension_count"), &Read::U32(16));
        assert_eq!(get(&p, "tokenizer.ggml.eos_token_id"), &Read::U32(4));
        assert_eq!(get(&p, "tokenizer.ggml.add_bos_token"), &Read::Bool(false));
        let Read::Str(template) = get(&p, "tokenizer.chat_template") else {
            panic!("chat template is not a string");
        };
        assert!(template.contains("<|im_start|>assistant\n"));
    }

    #[test]
    fn vocabulary_arrays_agree_in_length_with_the_embedding_matrix() {
        let p = parse(&tiny_model_bytes());
        let n_vocab = vocab().len();
        assert_eq!(
            get(&p, "tokenizer.ggml.tokens"),
            &Read::Array(value_type::STRING, n_vocab)
        );
        assert_eq!(
            get(&p, "tokenizer.ggml.scores"),
            &Read::Array(value_type::F32, n_vocab)
        );
        assert_eq!(
            get(&p, "tokenizer.ggml.token_type"),
            &Read::Array(value_type::I32, n_vocab)
        );
        let embd = p
            .tensors
            .iter()
            .find(|t| t.name == "token_embd.weight")
            .unwrap();
        assert_eq!(embd.dims, vec![N_EMBD, n_vocab as u64]);
    }

    #[test]
    fn vocabulary_has_control_tokens_and_every_byte() {
        let toks = vocab();
        assert_eq!(toks[IM_END as usize].text, "<|im_end|>");
        assert_eq!(toks[IM_END as usize].kind, TokenKind::Control);
        assert_eq!(toks[BOS as usize].text, "<s>");
        let bytes = toks.iter().filter(|t| t.kind == TokenKind::Byte).count();
        assert_eq!(bytes, 256);
        let mut texts: Vec<_> = toks.iter().map(|t| &t.text).collect();
        texts.sort();
        texts.dedup();
        assert_eq!(texts.len(), toks.len(), "token texts must be unique");
    }

    #[test]
    fn tensor_data_is_aligned_and_fills_the_file() {
        let bytes = tiny_model_bytes();
        let p = parse(&bytes);
        assert_eq!(p.data_start as u64 % ALIGNMENT, 0);
        let mut end = 0;
        for t in &p.tensors {
            assert_eq!(t.ggml_type, GGML_TYPE_F32, "{}", t.name);
            assert_eq!(t.offset % ALIGNMENT, 0, "{} is misaligned", t.name);
            assert!(t.offset >= end, "{} overlaps its predecessor", t.name);
            end = t.offset + 4 * t.dims.iter().product::<u64>();
        }
        assert_eq!(bytes.len() as u64, align(p.data_start as u64 + end));
    }

    #[test]
    fn norm_weights_are_ones_and_random_weights_have_the_intended_spread() {
        let bytes = tiny_model_bytes();
        let p = parse(&bytes);
        let floats = |name: &str| -> Vec<f32> {
            let t = p.tensors.iter().find(|t| t.name == name).unwrap();
            let start = p.data_start + t.offset as usize;
            let n = t.dims.iter().product::<u64>() as usize;
            bytes[start..start + 4 * n]
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect()
        };
        assert!(floats("blk.1.ffn_norm.weight").iter().all(|&x| x == 1.0));
        let w = floats("blk.0.attn_q.weight");
        let mean = w.iter().map(|&x| f64::from(x)).sum::<f64>() / w.len() as f64;
        let var = w
            .iter()
            .map(|&x| (f64::from(x) - mean).powi(2))
            .sum::<f64>()
            / w.len() as f64;
        assert!(mean.abs() < 0.005, "mean {mean}");
        assert!(
            (var.sqrt() - WEIGHT_STD).abs() < 0.005,
            "std {}",
            var.sqrt()
        );
    }

    #[test]
    fn output_is_deterministic() {
        assert_eq!(fnv1a(&tiny_model_bytes()), fnv1a(&tiny_model_bytes()));
    }

    #[test]
    fn tiny_model_is_written_once_under_a_content_name_and_matches_the_bytes() {
        let path = tiny_model();
        assert_eq!(path, tiny_model());
        assert_eq!(std::fs::read(&path).unwrap(), tiny_model_bytes());
        let name = path.file_name().unwrap().to_str().unwrap();
        assert_eq!(
            name,
            format!("tiny-llama-{:016x}.gguf", fnv1a(&tiny_model_bytes()))
        );
    }

    #[test]
    fn write_tiny_model_writes_the_same_bytes_to_any_path() {
        let dir = std::env::temp_dir().join(format!("bitnet-testkit-gguf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("m.gguf");
        write_tiny_model(&path).unwrap();
        let written = std::fs::read(&path);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(written.unwrap(), tiny_model_bytes());
    }
}
