//! Hostile model files: a damaged or inconsistent GGUF (or HF folder) is refused at load with an
//! error naming the file and the key or tensor, what was expected and what was found, exit code
//! 1 and no backtrace; never a panic. The files are written by `support::gguf` (checked here
//! against the `gguf` package's reader), and a fuzzer mutates their headers.

use crate::support::gguf::{self, Field, Gguf, Kind, TensorSpec, Val};
use crate::support::*;
use rand::{Rng, SeedableRng};
use reviewer2::model::generate::{generate, Request, Sampling};
use reviewer2::model::load::source::resolve;
use reviewer2::model::load::Model;
use reviewer2::model::options::LoadOptions;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::process::Output;

/// A recipe in `dir` whose model is `model`, for `pipeline sample` (the cheapest command that
/// loads a model): the repo's templates beside it, a few new tokens.
fn recipe(dir: &Path, model: &Path) {
    let tdir = dir.join("templates");
    std::fs::create_dir_all(&tdir).unwrap();
    for f in ["chat_user.jinja", "plain.jinja"] {
        std::fs::copy(repo().join("templates").join(f), tdir.join(f)).unwrap();
    }
    let toml = format!(
        "[generate]\nmodel = \"{}\"\nmax_new_tokens = 3\n",
        model.display()
    );
    std::fs::write(dir.join("pipeline.toml"), toml).unwrap();
}

/// `pipeline sample` on `model`, with candle asked to capture backtraces (as a developer's
/// `RUST_LIB_BACKTRACE=1` does) but no `RUST_BACKTRACE` and no `-vv`: a backtrace must not
/// reach the user's message.
fn sample(model: &Path) -> Output {
    let d = tempdir();
    recipe(d.path(), model);
    pipeline_cmd(d.path())
        .args(["sample", "--title", "Graph Neural Networks", "--no-adapter"])
        .env("RUST_LIB_BACKTRACE", "1")
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("spawn pipeline")
}

/// `pipeline sample` on `model` fails with exit code 1, no backtrace and no panic, and its
/// message names the file and every one of `needles`; returns stderr.
fn refused(model: &Path, needles: &[&str]) -> String {
    let o = sample(model);
    let err = stderr_of(&o);
    eprint!("{err}"); // shown with --nocapture: what the user reads
    assert_eq!(
        o.status.code(),
        Some(1),
        "exit code of a refused model:\n{err}"
    );
    for bad in ["stack backtrace", "\n   0: ", "panicked", "RUST_BACKTRACE"] {
        assert!(!err.contains(bad), "stderr shows {bad:?}:\n{err}");
    }
    let name = model.display().to_string();
    assert!(
        err.contains(&name),
        "the message does not name {name}:\n{err}"
    );
    for n in needles {
        assert!(err.contains(n), "the message does not say {n:?}:\n{err}");
    }
    assert!(
        err.contains("re-download or re-convert"),
        "the message does not say what to do:\n{err}"
    );
    err
}

/// The tiny Llama, changed by `f`, written as `<name>.gguf` in `dir`.
fn tiny(dir: &Path, name: &str, f: impl FnOnce(&mut Gguf)) -> PathBuf {
    let mut g = Gguf::tiny_llama(5);
    f(&mut g);
    let p = dir.join(format!("{name}.gguf"));
    g.write(&p);
    p
}

fn load(p: &Path) -> reviewer2::error::Result<Model> {
    Model::load(
        &resolve(p.to_str().unwrap(), "main")?,
        &LoadOptions::cpu_f32(),
    )
}

#[test]
fn our_gguf_writer_agrees_with_the_gguf_package() {
    let py = python_with(&[("gguf", "gguf")]);
    let d = tempdir();
    let g = Gguf::tiny_llama(5);
    let p = d.path().join("tiny.gguf");
    g.write(&p);
    let script = r#"
import gguf, json, sys
r = gguf.GGUFReader(sys.argv[1])
kv = {}
for k, f in r.fields.items():
    if k.startswith("GGUF."):
        continue
    v = f.contents()
    kv[k] = v
ts = [{"name": t.name, "dims": [int(x) for x in t.shape], "type": int(t.tensor_type),
       "bytes": int(t.n_bytes), "first": [int(b) for b in t.data.tobytes()[:8]]} for t in r.tensors]
print(json.dumps({"kv": kv, "tensors": ts, "alignment": r.alignment},
                 default=lambda o: o.item() if hasattr(o, "item") else o.tolist()))
"#;
    let out = run_python(&py, &["-c", script, p.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["alignment"], 32);
    let kv = v["kv"].as_object().unwrap();
    assert_eq!(kv.len(), g.kv.len(), "{kv:?}");
    for (k, val) in &g.kv {
        let got = &kv[k];
        match val {
            Val::Str(s) => assert_eq!(got, s.as_str(), "{k}"),
            Val::U32(x) => assert_eq!(got, *x, "{k}"),
            Val::F32(x) => assert_eq!(got.as_f64().unwrap() as f32, *x, "{k}"),
            Val::Bool(x) => assert_eq!(got, *x, "{k}"),
            Val::Arr(_, items) => {
                let got = got.as_array().unwrap();
                assert_eq!(got.len(), items.len(), "{k}");
                for (a, b) in got.iter().zip(items) {
                    match b {
                        Val::Str(s) => assert_eq!(a, s.as_str(), "{k}"),
                        Val::I32(x) => assert_eq!(a, *x, "{k}"),
                        other => panic!("{k}: {other:?} unchecked"),
                    }
                }
            }
            other => panic!("{k}: {other:?} unchecked"),
        }
    }
    let ts = v["tensors"].as_array().unwrap();
    assert_eq!(ts.len(), g.tensors.len());
    for (a, t) in ts.iter().zip(&g.tensors) {
        assert_eq!(a["name"], t.name.as_str());
        assert_eq!(a["dims"], serde_json::json!(t.dims), "{}", t.name);
        assert_eq!(a["type"], t.dtype, "{}", t.name);
        assert_eq!(a["bytes"], t.data.len(), "{}", t.name);
        assert_eq!(a["first"], serde_json::json!(t.data[..8]), "{}", t.name);
    }
}

/// The positive control: the tiny Llama loads and `pipeline sample` writes a review with it.
#[test]
fn the_tiny_gguf_loads_and_samples() {
    let d = tempdir();
    let p = tiny(d.path(), "tiny", |_| {});
    let m = load(&p).unwrap();
    assert_eq!(m.llama.cfg.num_attention_heads, gguf::HEADS);
    let o = sample(&p);
    assert!(o.status.success(), "{}", stderr_of(&o));
}

#[test]
fn a_zero_head_count_is_refused() {
    let d = tempdir();
    // Without a head dim in the file, it is derived by dividing by the head count.
    let p = tiny(d.path(), "no_heads", |g| {
        g.set("llama.attention.head_count", Val::U32(0));
        g.remove("llama.rope.dimension_count");
    });
    refused(&p, &["llama.attention.head_count is 0"]);
    let p = tiny(d.path(), "no_heads_dim", |g| {
        g.set("llama.attention.head_count", Val::U32(0));
    });
    refused(&p, &["llama.attention.head_count is 0"]);
    let p = tiny(d.path(), "no_layers", |g| {
        g.set("llama.block_count", Val::U32(0));
    });
    refused(&p, &["llama.block_count is 0"]);
}

#[test]
fn kv_heads_that_do_not_divide_the_heads_are_refused() {
    let d = tempdir();
    let p = tiny(d.path(), "kv3", |g| {
        g.set("llama.attention.head_count_kv", Val::U32(3));
    });
    refused(
        &p,
        &["llama.attention.head_count 4 is not a multiple of llama.attention.head_count_kv 3"],
    );
}

#[test]
fn a_zero_alignment_is_refused() {
    let d = tempdir();
    let p = tiny(d.path(), "align0", |g| {
        g.set("general.alignment", Val::U32(0));
    });
    refused(&p, &["general.alignment is 0", "power of two"]);
    let p = tiny(d.path(), "align48", |g| {
        g.set("general.alignment", Val::U32(48));
    });
    refused(&p, &["general.alignment is 48"]);
}

#[test]
fn a_tensor_of_the_wrong_shape_is_named_with_both_shapes() {
    let d = tempdir();
    // 12 rows where 2 KV heads of dim 8 make 16.
    let p = tiny(d.path(), "short_k", |g| {
        let t = g.tensor_mut("blk.1.attn_k.weight");
        t.dims = vec![gguf::HIDDEN as u64, 12];
        t.data.truncate(12 * gguf::HIDDEN * 4);
    });
    refused(&p, &["blk.1.attn_k.weight", "[12, 32]", "[16, 32]"]);
}

#[test]
fn a_missing_tensor_is_named() {
    let d = tempdir();
    let p = tiny(d.path(), "no_up", |g| {
        g.remove_tensor("blk.1.ffn_up.weight");
    });
    refused(&p, &["blk.1.ffn_up.weight", "missing"]);
}

#[test]
fn a_special_token_id_beyond_the_vocabulary_is_refused() {
    let d = tempdir();
    let p = tiny(d.path(), "bos", |g| {
        g.set("tokenizer.ggml.bos_token_id", Val::U32(100_000));
    });
    refused(&p, &["tokenizer.ggml.bos_token_id is 100000", "261 tokens"]);
    let p = tiny(d.path(), "eos", |g| {
        g.set("tokenizer.ggml.eos_token_id", Val::U32(261));
    });
    refused(&p, &["tokenizer.ggml.eos_token_id is 261"]);
}

#[test]
fn a_truncated_file_is_refused() {
    let d = tempdir();
    let (bytes, fields) = Gguf::tiny_llama(5).to_bytes();
    let header_end = fields.last().map(|f| f.pos + f.width).unwrap();
    // In the metadata, in the tensor entries, in the tensor data.
    for (name, at, says) in [
        ("in_metadata", 200, "the file ends"),
        ("in_tensors", header_end - 10, "the file ends"),
        ("in_data", bytes.len() - 100, "beyond the end of the file"),
    ] {
        let p = d.path().join(format!("{name}.gguf"));
        std::fs::write(&p, &bytes[..at]).unwrap();
        refused(&p, &[says]);
    }
    // The real model, cut 2 MB in: its whole header, the start of its data.
    let p = d.path().join("SmolLM2-cut.gguf");
    let mut cut = vec![0u8; 2 << 20];
    use std::io::Read;
    std::fs::File::open(smollm2())
        .unwrap()
        .read_exact(&mut cut)
        .unwrap();
    std::fs::write(&p, &cut).unwrap();
    refused(&p, &["beyond the end of the file"]);
}

#[test]
fn a_tokenizer_larger_than_the_embedding_is_refused() {
    let d = tempdir();
    // GGUF: 261 tokens over an embedding of 200 rows.
    let p = tiny(d.path(), "small_embd", |g| {
        g.set("llama.vocab_size", Val::U32(200));
        let t = g.tensor_mut("token_embd.weight");
        t.dims = vec![gguf::HIDDEN as u64, 200];
        t.data.truncate(200 * gguf::HIDDEN * 4);
    });
    refused(&p, &["reaches id 260", "200 rows", "token_embd.weight"]);
    // An HF folder: SmolLM2's tokenizer (49,152 tokens) over an embedding of 100 rows.
    let dir = d.path().join("small-vocab");
    let mut cfg = tiny_cfg();
    cfg.vocab_size = 100;
    cfg.tie_word_embeddings = true;
    cfg.max_position_embeddings = 2048; // room for the prompt
    model_folder(&dir, &cfg, 3);
    let err = refused(&dir, &["tokenizer.json", "100 rows", "vocab_size 100"]);
    assert!(err.contains("reaches id 49151"), "{err}");
}

#[test]
fn an_hf_tensor_of_the_wrong_shape_is_named_with_both_shapes() {
    let d = tempdir();
    let dir = d.path().join("bad-shape");
    let mut cfg = tiny_cfg();
    cfg.vocab_size = smollm2_vocab();
    cfg.max_position_embeddings = 2048; // room for the prompt
    model_folder(&dir, &cfg, 3);
    // The config now claims a wider MLP than the weights hold.
    let mut bad = cfg.clone();
    bad.intermediate_size = 28;
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_vec_pretty(&bad.to_hf_json()).unwrap(),
    )
    .unwrap();
    refused(
        &dir,
        &[
            "model.safetensors",
            "model.layers.0.mlp.gate_proj.weight",
            "[24, 16]",
            "[28, 16]",
        ],
    );
}

#[test]
fn another_architecture_stays_unsupported() {
    let d = tempdir();
    let p = tiny(d.path(), "qwen", |g| {
        g.set("general.architecture", Val::Str("qwen2".into()));
    });
    let o = sample(&p);
    assert_eq!(o.status.code(), Some(3), "{}", stderr_of(&o));
}

/// How long the fuzzer runs: `REVIEWER2_FUZZ_SECS` (default 3 s); its first case's seed:
/// `REVIEWER2_FUZZ_SEED` (default 0, or random when the time is set and the seed is not).
fn fuzz_plan() -> (f64, u64) {
    let secs = std::env::var("REVIEWER2_FUZZ_SECS")
        .ok()
        .map(|s| s.parse::<f64>().expect("REVIEWER2_FUZZ_SECS: seconds"));
    let seed = match std::env::var("REVIEWER2_FUZZ_SEED") {
        Ok(s) => s.parse().expect("REVIEWER2_FUZZ_SEED: a number"),
        Err(_) if secs.is_some() => rand::random::<u32>() as u64 * 1_000_000,
        Err(_) => 0,
    };
    (secs.unwrap_or(3.0), seed)
}

/// One case: the tiny Llama changed as `seed` draws (header fields set to edge values, bytes
/// flipped, inserted or cut, metadata of other types, tensors reshaped or dropped, the file
/// truncated), as bytes.
fn mutate(seed: u64) -> Vec<u8> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut g = Gguf::tiny_llama(5);
    // Meaning: a key or tensor changed before writing.
    let meaning = rng.random_range(0..3);
    for _ in 0..meaning {
        match rng.random_range(0..6) {
            0 => {
                let i = rng.random_range(0..g.kv.len());
                g.kv[i].1 = edge_value(&mut rng);
            }
            1 => {
                let i = rng.random_range(0..g.kv.len());
                g.kv.remove(i);
            }
            2 => {
                let i = rng.random_range(0..g.tensors.len());
                g.tensors.remove(i);
            }
            3 => {
                let i = rng.random_range(0..g.tensors.len());
                let t: &mut TensorSpec = &mut g.tensors[i];
                let j = rng.random_range(0..t.dims.len());
                t.dims[j] = edge_u64(&mut rng, t.dims[j]);
            }
            4 => {
                let i = rng.random_range(0..g.kv.len());
                let j = rng.random_range(0..g.kv.len());
                let k = g.kv[i].0.clone();
                g.kv[j].0 = k; // a duplicate key
            }
            _ => {
                let key = [
                    "general.alignment",
                    "llama.attention.head_count",
                    "llama.attention.head_count_kv",
                    "llama.block_count",
                    "llama.embedding_length",
                    "llama.vocab_size",
                    "llama.rope.dimension_count",
                    "llama.context_length",
                    "tokenizer.ggml.bos_token_id",
                    "tokenizer.ggml.eos_token_id",
                ][rng.random_range(0..10)];
                let v = edge_u64(&mut rng, 32) as u32;
                g.set(key, Val::U32(v));
            }
        }
    }
    let (mut bytes, fields) = g.to_bytes();
    let header_end = fields.last().map_or(bytes.len(), |f| f.pos + f.width);
    // Bytes: header fields and header bytes changed after writing.
    for _ in 0..rng.random_range(if meaning == 0 { 1 } else { 0 }..3) {
        match rng.random_range(0..5) {
            0 | 1 => {
                let f = pick_field(&mut rng, &fields);
                let old = read_le(&bytes[f.pos..f.pos + f.width]);
                let v = match f.kind {
                    Kind::Offset => edge_u64(&mut rng, bytes.len() as u64),
                    Kind::ValueType | Kind::TensorType => rng.random_range(0..40),
                    _ => edge_u64(&mut rng, old),
                };
                bytes[f.pos..f.pos + f.width].copy_from_slice(&v.to_le_bytes()[..f.width]);
            }
            2 => {
                // Near a field, or anywhere in the header.
                let i = if rng.random_bool(0.5) {
                    let f = pick_field(&mut rng, &fields);
                    (f.pos + rng.random_range(0..f.width + 8)).min(header_end - 1)
                } else {
                    rng.random_range(0..header_end)
                };
                bytes[i] ^= 1 << rng.random_range(0..8);
            }
            3 => {
                let i = rng.random_range(0..header_end);
                if rng.random_bool(0.5) {
                    bytes.insert(i, rng.random());
                } else {
                    bytes.remove(i);
                }
            }
            _ => {
                let at = if rng.random_bool(0.7) {
                    rng.random_range(0..header_end.min(bytes.len()))
                } else {
                    rng.random_range(0..bytes.len())
                };
                bytes.truncate(at);
                return bytes;
            }
        }
    }
    bytes
}

/// A header field: a kind first, then one of its fields, so that the vocabulary's thousand
/// string lengths do not drown the dozen tensor offsets.
fn pick_field(rng: &mut impl Rng, fields: &[Field]) -> Field {
    let kinds: Vec<Kind> = fields.iter().map(|f| f.kind).fold(Vec::new(), |mut v, k| {
        if !v.contains(&k) {
            v.push(k);
        }
        v
    });
    let k = kinds[rng.random_range(0..kinds.len())];
    let of: Vec<&Field> = fields.iter().filter(|f| f.kind == k).collect();
    *of[rng.random_range(0..of.len())]
}

fn read_le(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a[..b.len()].copy_from_slice(b);
    u64::from_le_bytes(a)
}

/// A value at an edge: zero, one, around `near`, powers of two, the largest of each width.
fn edge_u64(rng: &mut impl Rng, near: u64) -> u64 {
    match rng.random_range(0..9) {
        0 => 0,
        1 => 1,
        2 => near.wrapping_add(1),
        3 => near.wrapping_sub(1),
        4 => 1 << rng.random_range(0..64),
        5 => u32::MAX as u64 - rng.random_range(0..2),
        6 => u64::MAX - rng.random_range(0..2),
        7 => near.wrapping_mul(rng.random_range(2..1000)),
        _ => rng.random(),
    }
}

fn edge_value(rng: &mut impl Rng) -> Val {
    match rng.random_range(0..7) {
        0 => Val::U8(rng.random()),
        1 => Val::I32(rng.random()),
        2 => Val::U32(edge_u64(rng, 32) as u32),
        3 => Val::U64(edge_u64(rng, 32)),
        4 => Val::F32(f32::from_bits(rng.random())),
        5 => Val::Str("x".repeat(rng.random_range(0..5))),
        _ => Val::Arr(
            gguf::ty::U8,
            (0..rng.random_range(0..4)).map(Val::U8).collect(),
        ),
    }
}

/// Mutated tiny Llamas, loaded one after another for `REVIEWER2_FUZZ_SECS` (3 s by default):
/// none may panic, and none may get as far as a panic candle's readers would have had (the
/// catch at the last line of defence) before our checks refused it; every refusal is an error
/// naming the file. A model that loads generates a token. A failure prints the case's seed:
/// `REVIEWER2_FUZZ_SEED=<seed> REVIEWER2_FUZZ_SECS=0 cargo test --test it fuzz` replays it.
#[test]
fn fuzzed_gguf_headers_are_refused_without_a_panic() {
    let (secs, first) = fuzz_plan();
    let d = tempdir();
    let p = d.path().join("case.gguf");
    let start = std::time::Instant::now();
    let (mut cases, mut refused, mut loaded) = (0u64, 0u64, 0u64);
    let mut kinds = std::collections::BTreeMap::<String, u64>::new();
    loop {
        let seed = first + cases;
        std::fs::write(&p, mutate(seed)).unwrap();
        let replay = format!("replay: REVIEWER2_FUZZ_SEED={seed} REVIEWER2_FUZZ_SECS=0");
        let r = std::panic::catch_unwind(AssertUnwindSafe(|| load(&p)));
        match r {
            Err(_) => panic!("case {seed} panicked; {replay}"),
            Ok(Ok(m)) => {
                loaded += 1;
                // A model that loads runs: its forward may refuse (a context of one token),
                // never panic.
                let run = std::panic::catch_unwind(AssertUnwindSafe(
                    || -> reviewer2::error::Result<()> {
                        let ids = m.meta.tok.encode("the", false)?;
                        generate(
                            &m,
                            vec![Request { id: 0, ids }],
                            &Sampling::greedy(1),
                            1,
                            |_, _| Ok(()),
                        )?;
                        Ok(())
                    },
                ));
                assert!(
                    run.is_ok(),
                    "case {seed} loaded, then panicked generating; {replay}"
                );
            }
            Ok(Err(e)) => {
                refused += 1;
                let msg = e.to_string();
                assert!(
                    !msg.contains("the reader failed on malformed data"),
                    "case {seed} reached a panic in candle (caught): {msg}; {replay}"
                );
                assert!(
                    msg.contains(p.to_str().unwrap()),
                    "case {seed}'s error does not name the file: {msg}; {replay}"
                );
                // Which check refused it, roughly.
                let what = [
                    ("not a usable GGUF file", "the header walk"),
                    ("is missing", "a missing tensor"),
                    ("cannot load", "a tensor type candle cannot load"),
                    ("has shape", "a tensor's shape"),
                    ("token", "the tokenizer"),
                    ("GGUF metadata", "the config's keys"),
                    ("llama.", "the config's values"),
                    ("architecture", "the architecture"),
                ]
                .iter()
                .find(|(needle, _)| msg.contains(needle))
                .map_or("other", |(_, what)| what);
                *kinds.entry(what.to_string()).or_default() += 1;
                if what == "other" {
                    eprintln!("fuzz: case {seed}, other: {msg}");
                }
            }
        }
        cases += 1;
        if start.elapsed().as_secs_f64() >= secs {
            break;
        }
    }
    eprintln!(
        "fuzz: {cases} cases from seed {first} in {:.1} s: {refused} refused, {loaded} loaded",
        start.elapsed().as_secs_f64()
    );
    for (k, n) in &kinds {
        eprintln!("  {n:6} {k}");
    }
    assert!(refused > cases / 2, "most mutations should be refused");
}
